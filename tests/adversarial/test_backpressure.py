"""A client that stops reading costs the sidecar bounded memory, on both transports.

The upstream is a firehose (valid 16 KiB deltas as fast as they are read). The client
takes the first delta and then reads nothing for 30 s. The sidecar (its own process)
must stop reading the provider once its merge buffer is full, so its RSS grows by less
than 20 MiB; before, the LiteLLM path buffered everything (+72 MiB per 30 s). With a
short stall limit the stream then ends with CLIENT_STALLED (README error table).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason, RemoteError
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from tests.conftest import PLANTED_KEY
from tests.support.configs import KEY_ENV, write_config
from tests.support.harness import chat_request
from tests.support.openai_upstream import OpenAIUpstream, Scenario, delta_frame
from tests.support.processes import SidecarProcess, start_sidecar_process

STALLED_FOR_S = 30.0
RSS_BUDGET_MIB = 20.0
# Two alternating frames: LiteLLM ends a stream after 100 identical chunks.
FIREHOSE = Scenario(
    chunks=["go"],
    flood=delta_frame("x" * 16384, "firehose") + delta_frame("y" * 16384, "firehose"),
    flood_count=10**7,
)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _start(upstream: OpenAIUpstream, tmp_path: Path, *extra: str) -> SidecarProcess:
    config = write_config(tmp_path / "config.yaml", upstream.url, ["firehose"], "  num_retries: 0\n")
    return start_sidecar_process(config, tmp_path / "sidecar.log", {KEY_ENV: PLANTED_KEY}, extra_args=list(extra))


@pytest.mark.timeout(120)
async def test_stalled_reader_keeps_sidecar_rss_bounded(transport: str, tmp_path: Path) -> None:
    async with OpenAIUpstream({"firehose": FIREHOSE}) as upstream:
        sidecar = await asyncio.to_thread(_start, upstream, tmp_path)
        try:
            async with grpc.aio.insecure_channel(sidecar.address) as channel:
                call = pb_grpc.RemoteInferenceServiceStub(channel).Generate(
                    chat_request("firehose", request_id=f"stalled-{transport}"), timeout=STALLED_FOR_S + 30
                )
                first = await call.read()
                assert first.delta.text == "go"
                await asyncio.sleep(2.0)  # buffers fill, warm-up allocations settle
                before = rss_mib(sidecar.process.pid)
                started = time.monotonic()
                peak = before
                while time.monotonic() - started < STALLED_FOR_S:
                    await asyncio.sleep(1.0)
                    peak = max(peak, rss_mib(sidecar.process.pid))
                growth = peak - before
                print(
                    f"\n[backpressure] {transport}: sidecar RSS {before:.0f} MiB -> peak {peak:.0f} MiB "
                    f"(+{growth:.1f} MiB) over {STALLED_FOR_S:.0f} s of a stalled reader"
                )
                assert growth < RSS_BUDGET_MIB, f"{transport}: +{growth:.1f} MiB while the client read nothing"
                call.cancel()
        finally:
            await asyncio.to_thread(sidecar.stop)


@pytest.mark.timeout(60)
async def test_stream_stalled_past_the_limit_ends_with_client_stalled(transport: str, tmp_path: Path) -> None:
    async with OpenAIUpstream({"firehose": FIREHOSE}) as upstream:
        sidecar = await asyncio.to_thread(_start, upstream, tmp_path, "--stall-limit-s", "2")
        try:
            async with grpc.aio.insecure_channel(sidecar.address) as channel:
                call = pb_grpc.RemoteInferenceServiceStub(channel).Generate(
                    chat_request("firehose", request_id=f"stall-limit-{transport}"), timeout=30
                )
                assert (await call.read()).delta.text == "go"
                await asyncio.sleep(6.0)  # past the limit: the sidecar gives up on us
                error: RemoteError | None = None
                try:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                except grpc.aio.AioRpcError as exc:
                    error = RemoteError.from_status(exc.code(), exc.details(), exc.trailing_metadata())
                assert error is not None, "the stream went on although the client stalled past the limit"
                assert error.reason is Reason.CLIENT_STALLED, error
                assert error.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await asyncio.to_thread(sidecar.stop)
        log = sidecar.log.read_text()
        assert "stall-limit-" in log and "CLIENT_STALLED" in log, log[-2000:]
        record = await upstream.wait_closed("firehose", timeout=5)
        assert record.outcome == "disconnected", "the provider stream is closed when the stream ends"
