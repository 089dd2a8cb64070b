"""Faults between the provider, the sidecar and the engine side: each one ends promptly in
its documented status (README error table), and the upstream HTTP connection is closed
promptly after the fault.

"Promptly" is FAULT_BUDGET_S, a wide margin for a loaded two-core box: every scenario is
built so that letting the fault run its course (the stall, the rest of the stream) would
take 20 s or more, so the bound still tells a prompt end from a leak. The times are printed
for reading; the figures belong to the benchmarks.

Everything is real: an aiohttp OpenAI-compatible upstream on 127.0.0.1, a grpc.aio
sidecar (in-process, or its own process for SIGKILL), real LiteLLM, and the engine
side's ``SidecarClient``. Retries are off on both sides (client ``RetryPolicy(attempts=1)``,
sidecar ``num_retries: 0``) so retry back-off does not blur the timings, except in the
test that checks no text is duplicated, which runs with the defaults of both.

Every test plants the provider key (``TEST_UPSTREAM_KEY``) and checks that it reaches no
client-visible error, trailer, log record (DEBUG) or metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from exo_remote_engine.contract.errors import STATUS_DETAILS_KEY, Reason, RemoteError
from exo_remote_engine.engine.connection.target import RetryPolicy
from exo_remote_engine.server import RunningSidecar, SidecarSettings, start_sidecar
from exo_remote_engine.sidecar.config.loader import load_config
from tests.conftest import PLANTED_KEY
from tests.support.configs import KEY_ENV, write_config
from tests.support.harness import (
    EXCEPTION_REPR,
    PROVIDER_STATUSES,
    assert_no_key,
    chat_request,
    drain,
    error_surface,
    metrics_text_of,
    raw_generate,
    sidecar_client,
)
from tests.support.openai_upstream import OpenAIUpstream, Scenario, StreamRecord
from tests.support.processes import free_port, start_sidecar_process
from tests.support.transports import FAST_PATH_ENV, assert_served_by
from tests.support.waits import eventually

FAULT_BUDGET_S = 5.0
LONG_STALL_S = 30.0  # a provider stall no test waits out: the fault must end it first
NO_SIDECAR_RETRIES = "  num_retries: 0\n"
LEAKY = f"Incorrect API key provided: {PLANTED_KEY}. You can find your API key at https://example.invalid"

StartSidecar = Callable[..., Awaitable[RunningSidecar]]
# fault -> (seconds from the fault to the client's error, to the upstream's close record)
TIMINGS: dict[str, tuple[float | None, float | None]] = {}

# Every test runs on both transports, set up before the sidecar fixtures that read it.
pytestmark = pytest.mark.usefixtures("transport")


@pytest.fixture(scope="module", autouse=True)
def _print_timings() -> Iterator[None]:
    yield
    for fault, (error_s, closed_s) in TIMINGS.items():
        shown = [f"{v * 1000:.0f} ms" if v is not None else "-" for v in (error_s, closed_s)]
        print(f"\n[faults] {fault:<34} error after {shown[0]:>7}, upstream closed after {shown[1]:>7}", end="")
    print()


def _timing(fault: str, error_s: float | None, closed_s: float | None) -> None:
    fault = f"{'direct' if os.environ.get(FAST_PATH_ENV) != '0' else 'litellm'}: {fault}"
    TIMINGS[fault] = (error_s, closed_s)
    for value in (error_s, closed_s):
        assert value is None or value < FAULT_BUDGET_S, f"{fault}: {value:.3f}s after the fault"


@pytest.fixture
def start(sidecar_for: Callable[..., Awaitable[RunningSidecar]]) -> StartSidecar:
    """In-process sidecars for ``upstream``'s aliases; ``settings`` is exo_remote_settings YAML
    (default: no sidecar retries)."""

    async def _start(upstream: OpenAIUpstream, *aliases: str, settings: str = NO_SIDECAR_RETRIES) -> RunningSidecar:
        return await sidecar_for(upstream, *aliases, exo_settings=settings)

    return _start


@pytest.fixture(autouse=True)
def _debug_logs(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Iterator[None]:
    """Everything at DEBUG; afterwards neither the log nor anything printed (LiteLLM prints its
    call parameters at debug level) holds the key."""
    caplog.set_level(logging.DEBUG)
    yield
    out, err = capfd.readouterr()
    assert_no_key(caplog.text, out, err, where="the DEBUG log or the process's stdout/stderr")


def _no_key_anywhere(caplog: pytest.LogCaptureFixture, sidecar: RunningSidecar, *surfaces: Any) -> None:
    assert_no_key(*surfaces, where="a client-visible error")
    assert_no_key(caplog.text, *(r.getMessage() for r in caplog.records), where="the DEBUG log")
    assert_no_key(metrics_text_of(sidecar), where="the metrics text")


async def _closed(upstream: OpenAIUpstream, model: str, timeout: float = 3 * FAULT_BUDGET_S) -> StreamRecord:
    return await upstream.wait_closed(model, timeout=timeout)


def _retry_info(trailers: Any) -> error_details_pb2.RetryInfo | None:
    for key, value in trailers:
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info
    return None


# ----------------------------------------------------------------------- provider statuses


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("status", "retry_after", "reason", "code"), PROVIDER_STATUSES)
async def test_provider_status_ends_promptly_in_its_documented_status(
    upstream: OpenAIUpstream,
    start: StartSidecar,
    caplog: pytest.LogCaptureFixture,
    status: int,
    retry_after: str | None,
    reason: Reason,
    code: grpc.StatusCode,
    transport: str,
) -> None:
    upstream.scenarios["bad"] = Scenario(status=status, retry_after=retry_after, error_message=LEAKY)
    sidecar = await start(upstream, "bad")

    _text, error, failed_at, _events = await drain(sidecar_client(sidecar.address), chat_request("bad"))
    record = await _closed(upstream, "bad")
    assert error is not None, "the call must fail"
    assert (error.reason, error.grpc_code) == (reason, code), error
    assert error.retry_after_s == (float(retry_after) if retry_after else None), "RetryInfo only with Retry-After"
    assert record.outcome == "error"
    assert_served_by(upstream.requests_for("bad")[0].headers, transport)
    sent = upstream.requests_for("bad")[0].headers.get("authorization")
    assert sent == f"Bearer {PLANTED_KEY}", "the key is really planted: the provider received it"
    _timing(
        f"HTTP {status}" + (f" Retry-After {retry_after}" if retry_after else ""), failed_at - record.ended_at, None
    )
    assert upstream.in_flight == 0

    raw = await raw_generate(sidecar.address, chat_request("bad"))
    await _closed(upstream, "bad")
    assert raw.code is code and not raw.events
    assert (_retry_info(raw.trailers) is not None) == (retry_after is not None)
    assert not EXCEPTION_REPR.search(raw.details), raw.details
    _no_key_anywhere(caplog, sidecar, *error_surface(error), *raw.surface())


# ----------------------------------------------------------------------- stalls and deadlines


@pytest.mark.timeout(30)
async def test_stall_before_first_byte_ends_at_the_client_deadline(
    upstream: OpenAIUpstream, start: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.scenarios["stall"] = Scenario(stall_before_first_byte_s=LONG_STALL_S)
    sidecar = await start(upstream, "stall")
    client = sidecar_client(sidecar.address, deadline_s=0.5)
    started = time.monotonic()
    text, error, failed_at, _events = await drain(client, chat_request("stall"))
    deadline = started + 0.5
    assert error is not None and text == ""
    assert (error.reason, error.grpc_code) == (Reason.DEADLINE_EXCEEDED, grpc.StatusCode.DEADLINE_EXCEEDED), error
    _timing("stall, client deadline 0.5 s", failed_at - deadline, None)
    await _closed(upstream, "stall")  # whenever it ends: not leaked past the stall
    _no_key_anywhere(caplog, sidecar, *error_surface(error))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["deadline", "cancel"])
async def test_stall_before_first_byte_upstream_is_closed_promptly_at_the_end(
    upstream: OpenAIUpstream, start: StartSidecar, how: str
) -> None:
    upstream.scenarios["stall"] = Scenario(stall_before_first_byte_s=LONG_STALL_S, chunks=[f"x{i}" for i in range(50)])
    sidecar = await start(upstream, "stall")
    if how == "deadline":
        started = time.monotonic()
        _text, error, _, _events = await drain(sidecar_client(sidecar.address, deadline_s=0.5), chat_request("stall"))
        assert error is not None and error.reason is Reason.DEADLINE_EXCEEDED
        ended = started + 0.5
    else:
        task = asyncio.create_task(drain(sidecar_client(sidecar.address), chat_request("stall")))
        await eventually(lambda: upstream.requests_for("stall"), "the request reached the upstream")
        ended = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    record = await _closed(upstream, "stall")
    assert record.outcome == "disconnected", record
    assert record.ended_at - ended < FAULT_BUDGET_S, f"upstream closed {record.ended_at - ended:.3f}s after the end"


@pytest.mark.timeout(30)
async def test_stall_longer_than_the_configured_provider_timeout_is_provider_timeout(
    upstream: OpenAIUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    upstream.scenarios["stall"] = Scenario(stall_before_first_byte_s=LONG_STALL_S)
    config = write_config(tmp_path / "timeout.yaml", upstream.url, ["stall"], NO_SIDECAR_RETRIES)
    # LiteLLM's per-model timeout, as a LiteLLM proxy config sets it.
    config.write_text(config.read_text().replace("      api_key:", "      timeout: 0.5\n      api_key:"))
    sidecar = await start_sidecar(SidecarSettings(listen="127.0.0.1:0"), load_config(config))
    try:
        client = sidecar_client(sidecar.address, deadline_s=10)
        _text, error, failed_at, _events = await drain(client, chat_request("stall"))
        record = await _closed(upstream, "stall")
        fault = record.started_at + 0.5
        assert error is not None and error.reason is Reason.PROVIDER_TIMEOUT, error
        assert error.grpc_code is grpc.StatusCode.UNAVAILABLE
        assert failed_at - fault < FAULT_BUDGET_S
        assert record.outcome == "disconnected" and record.ended_at - fault < FAULT_BUDGET_S
    finally:
        await sidecar.stop(grace_s=None)


@pytest.mark.timeout(30)
async def test_deadline_expiry_mid_stream_ends_the_stream_and_the_upstream(
    upstream: OpenAIUpstream, start: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    chunks = [f"d{i} " for i in range(2000)]  # 40 s to run its course
    upstream.scenarios["slow"] = Scenario(chunks=chunks, interval_s=0.02)
    sidecar = await start(upstream, "slow")
    client = sidecar_client(sidecar.address, deadline_s=0.5)
    started = time.monotonic()
    text, error, failed_at, _events = await drain(client, chat_request("slow"))
    deadline = started + 0.5
    record = await _closed(upstream, "slow")
    assert error is not None and error.reason is Reason.DEADLINE_EXCEEDED, error
    assert error.grpc_code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert text and "".join(chunks).startswith(text), "a prefix of the reply, in order, no duplicates"
    _timing("deadline 0.5 s mid-stream", failed_at - deadline, record.ended_at - deadline)
    assert record.outcome == "disconnected" and record.ended_at - deadline < FAULT_BUDGET_S, record
    assert record.chunks_written < len(chunks)
    _no_key_anywhere(caplog, sidecar, *error_surface(error))


# ----------------------------------------------------------------------- broken streams


@pytest.mark.timeout(30)
async def test_drop_mid_stream_is_provider_unavailable_after_the_deltas_that_arrived(
    upstream: OpenAIUpstream, start: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    chunks = [f"p{i} " for i in range(40)]
    upstream.scenarios["drop"] = Scenario(chunks=chunks, drop_after_chunks=6, interval_s=0.02)
    sidecar = await start(upstream, "drop")
    text, error, failed_at, _events = await drain(sidecar_client(sidecar.address), chat_request("drop"))
    record = await _closed(upstream, "drop")
    assert record.outcome == "dropped" and record.chunks_written == 6
    assert error is not None and (error.reason, error.grpc_code) == (
        Reason.PROVIDER_UNAVAILABLE,
        grpc.StatusCode.UNAVAILABLE,
    ), error
    assert text == "".join(chunks[:6]), "exactly the deltas that arrived, once each"
    _timing("drop after 6 chunks", failed_at - record.ended_at, None)
    _no_key_anywhere(caplog, sidecar, *error_surface(error))


@pytest.mark.timeout(30)
async def test_drop_after_first_delta_is_never_retried_with_default_retries(
    upstream: OpenAIUpstream, start: StartSidecar
) -> None:
    """Default client RetryPolicy and default sidecar num_retries: still no duplicated text."""
    chunks = [f"q{i} " for i in range(40)]
    upstream.scenarios["drop"] = Scenario(chunks=chunks, drop_after_chunks=5, interval_s=0.01)
    sidecar = await start(upstream, "drop", settings="")
    text, error, _, _events = await drain(sidecar_client(sidecar.address, retry=RetryPolicy()), chat_request("drop"))
    assert error is not None and error.reason is Reason.PROVIDER_UNAVAILABLE
    assert text == "".join(chunks[:5])
    # Both retry loops run before an error reaches the client, so a wrong retry has already
    # reached the upstream; the wait is a wide margin for one fired late, in the background.
    await _closed(upstream, "drop")
    await asyncio.sleep(1.0)
    assert len(upstream.requests_for("drop")) == 1, "a stream that produced text must not be retried"


@pytest.mark.timeout(30)
async def test_drop_mid_stream_message_has_no_python_exception_repr(
    upstream: OpenAIUpstream, start: StartSidecar
) -> None:
    upstream.scenarios["drop"] = Scenario(chunks=["a "] * 20, drop_after_chunks=3, interval_s=0.01)
    sidecar = await start(upstream, "drop")
    _text, error, _, _events = await drain(sidecar_client(sidecar.address), chat_request("drop"))
    assert error is not None
    assert not EXCEPTION_REPR.search(error.message), error.message


@pytest.mark.timeout(30)
async def test_malformed_sse_mid_stream_is_provider_unavailable_and_closes_the_upstream(
    upstream: OpenAIUpstream, start: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    chunks = [f"m{i} " for i in range(2000)]  # 40 s to run its course
    upstream.scenarios["garbled"] = Scenario(chunks=chunks, malformed_after_chunks=5, interval_s=0.02)
    sidecar = await start(upstream, "garbled")
    text, error, failed_at, _events = await drain(sidecar_client(sidecar.address), chat_request("garbled"))
    record = await _closed(upstream, "garbled")
    fault = record.started_at + 5 * 0.02  # when the garbage frame was scheduled (never later than sent)
    assert error is not None and (error.reason, error.grpc_code) == (
        Reason.PROVIDER_UNAVAILABLE,
        grpc.StatusCode.UNAVAILABLE,
    ), error
    assert text == "".join(chunks[:5])
    _timing("malformed SSE after 5 chunks", failed_at - fault, record.ended_at - fault)
    assert record.outcome == "disconnected", record
    assert record.ended_at - fault < FAULT_BUDGET_S, f"upstream closed {record.ended_at - fault:.3f}s after it"
    _no_key_anywhere(caplog, sidecar, *error_surface(error))


# ----------------------------------------------------------------------- the client goes away


@pytest.mark.timeout(30)
async def test_client_cancel_closes_the_upstream_and_frees_the_stream(
    upstream: OpenAIUpstream, start: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.scenarios["slow"] = Scenario(chunks=[f"c{i} " for i in range(1000)], interval_s=0.02)
    sidecar = await start(upstream, "slow")
    stream = sidecar_client(sidecar.address).generate(chat_request("slow"))
    received = 0
    async for event in stream:
        received += len(event.delta.text)
        if received >= 20:
            break
    cancelled_at = time.monotonic()
    await stream.aclose()  # type: ignore[attr-defined]
    closed_at = time.monotonic()
    record = await _closed(upstream, "slow")
    _timing("client cancel mid-stream", closed_at - cancelled_at, record.ended_at - cancelled_at)
    assert record.outcome == "disconnected", record
    late = record.ended_at - cancelled_at
    assert late < FAULT_BUDGET_S, f"upstream closed {late:.3f}s late"
    wanted = 'exo_remote_requests_total{code="CANCELLED",model="slow",node="anonymous"} 1.0'
    await eventually(lambda: wanted in metrics_text_of(sidecar), "the cancelled stream is booked", FAULT_BUDGET_S)
    _no_key_anywhere(caplog, sidecar)


@pytest.mark.timeout(30)
async def test_provider_down_names_the_address_and_the_cause_to_the_client_and_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "the provider is unavailable" alone cannot tell a stopped server from a wrong address."""
    monkeypatch.setenv(KEY_ENV, PLANTED_KEY)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = write_config(tmp_path / "down.yaml", f"http://{dead}", ["tiny"], NO_SIDECAR_RETRIES)
    sidecar = await start_sidecar(SidecarSettings(listen="127.0.0.1:0"), load_config(config))
    try:
        text, error, _, _events = await drain(sidecar_client(sidecar.address), chat_request("tiny"))
        assert text == "" and error is not None and error.reason is Reason.PROVIDER_UNAVAILABLE, error
        assert error.message.startswith("the provider is unavailable (model 'tiny', provider openai"), error.message
        assert error.message.endswith(f": connection refused to {dead}"), error.message
        ends = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and " end code=" in r.getMessage()]
        assert any(f"connection refused to {dead}" in line for line in ends), ends
        _no_key_anywhere(caplog, sidecar, *error_surface(error))
    finally:
        await sidecar.stop(grace_s=None)


# ----------------------------------------------------------------------- the sidecar dies


@pytest.mark.timeout(120)
async def test_sidecar_sigkill_mid_stream_then_restart_on_the_same_port(
    upstream: OpenAIUpstream, tmp_path: Path, transport: str
) -> None:
    chunks = [f"k{i} " for i in range(2000)]
    upstream.scenarios["long"] = Scenario(chunks=chunks, interval_s=0.01)
    upstream.scenarios["short"] = Scenario(chunks=["back ", "again"])
    config = write_config(tmp_path / "kill.yaml", upstream.url, ["long", "short"], NO_SIDECAR_RETRIES)
    env = {KEY_ENV: PLANTED_KEY, "EXO_REMOTE_DISCOVER": "0"}
    logs = [tmp_path / "sidecar-1.log", tmp_path / "sidecar-2.log"]
    first = await asyncio.to_thread(
        start_sidecar_process, config, logs[0], env, "127.0.0.1:0", ["--log-level", "debug"]
    )
    second = None
    client = sidecar_client(first.address)
    try:
        stream = client.generate(chat_request("long"))
        text = ""
        async for event in stream:
            text += event.delta.text
            if len(text) >= 30:
                break
        killed_at = time.monotonic()
        first.process.kill()
        error: RemoteError | None = None
        try:
            async for event in stream:
                text += event.delta.text
        except RemoteError as exc:
            error = exc
        failed_at = time.monotonic()
        assert error is not None and error.reason is Reason.SIDECAR_UNAVAILABLE, error
        assert error.grpc_code is grpc.StatusCode.UNAVAILABLE
        client_noticed = failed_at - killed_at
        assert "".join(chunks).startswith(text), "what arrived is a prefix, in order, without duplicates"
        record = await _closed(upstream, "long")
        assert record.outcome == "disconnected", record
        _timing("sidecar SIGKILL mid-stream", client_noticed, record.ended_at - killed_at)
        assert_no_key(*error_surface(error), where="the client's error")

        await asyncio.to_thread(first.process.wait, 10)
        second = await asyncio.to_thread(
            start_sidecar_process, config, logs[1], env, f"127.0.0.1:{first.port}", ["--log-level", "debug"]
        )
        assert second.port == first.port
        # The same client (and channel) as before: it reconnects on its own.
        events = [event async for event in client.generate(chat_request("short"))]
        assert "".join(e.delta.text for e in events[:-1]) == "back again"
        assert events[-1].HasField("finished")
        for request in upstream.requests:  # both processes inherited the transport choice
            assert_served_by(request.headers, transport)
        await client.close()
    finally:
        await client.close()
        if first.process.poll() is None:
            first.process.kill()
        if second is not None:
            await asyncio.to_thread(second.stop)
    text_logs = [log.read_text(errors="replace") for log in logs]
    assert "request_id=t-long model=long" in text_logs[0], "the first sidecar's debug log is real"
    assert_no_key(*text_logs, where="the sidecar process logs")
