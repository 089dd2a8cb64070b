"""One hostile upstream must not stall the sidecar's other streams, on both transports.

Bodies: 200,000 ``data:`` lines without a blank line (the openai SDK's SSE reader buffered
them quadratically and blocked the event loop: an unrelated stream waited 26.6 s), and one
64 MiB line without a newline. While such a stream runs, a healthy stream of deltas every
10 ms keeps flowing (largest gap < 2 s here, a wide correctness margin; the added latency
itself, under 100 ms, is measured by ``python -m benchmarks.hostile_upstream``) and the
hostile stream ends with PROVIDER_UNAVAILABLE (README error table) after its first delta,
within seconds (the direct reader used to spend 20 s of a core on the 64 MiB line).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from exo_remote_engine.contract.errors import Reason
from tests.support.harness import RawOutcome, chat_request, raw_generate
from tests.support.openai_upstream import OpenAIUpstream, Scenario

HOSTILE: dict[str, Scenario] = {
    "many-data-lines": Scenario(chunks=["hostile"], flood=b"data: x\n", flood_count=200_000),
    "endless-line": Scenario(chunks=["hostile"], flood=b"a" * 65536, flood_count=1024),
}
HEALTHY = Scenario(chunks=[f"t{i} " for i in range(300)], interval_s=0.01)  # distinct: LiteLLM stops repeats
MAX_GAP_S = 2.0
MAX_HOSTILE_S = 5.0


async def _healthy_gaps(address: str) -> tuple[float, str]:
    """The largest wait between two deltas of a healthy stream, and its text."""
    async with grpc.aio.insecure_channel(address) as channel:
        from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc

        call = pb_grpc.RemoteInferenceServiceStub(channel).Generate(chat_request("healthy"), timeout=60)
        last = time.monotonic()
        gap = 0.0
        text = ""
        async for event in call:
            now = time.monotonic()
            gap, last = max(gap, now - last), now
            text += event.delta.text
        return gap, text


@pytest.mark.timeout(90)
@pytest.mark.parametrize("body", list(HOSTILE))
async def test_hostile_upstream_does_not_stall_other_streams(transport: str, body: str, sidecar_for: Any) -> None:
    async with OpenAIUpstream({"healthy": HEALTHY, body: HOSTILE[body]}) as upstream:
        sidecar = await sidecar_for(upstream, "healthy", body)
        healthy = asyncio.create_task(_healthy_gaps(sidecar.address))
        await asyncio.sleep(0.3)  # the healthy stream is flowing
        started = time.monotonic()
        hostile: RawOutcome = await raw_generate(sidecar.address, chat_request(body), timeout_s=60)
        hostile_s = time.monotonic() - started
        gap, text = await healthy
        print(
            f"\n[hostile] {transport} {body}: healthy stream's largest gap {gap * 1000:.0f} ms, "
            f"hostile stream ended after {hostile_s:.2f} s"
        )
        assert text == HEALTHY.text
        assert gap < MAX_GAP_S, f"a hostile upstream stalled an unrelated stream for {gap:.1f} s"
        # Contained means cheap too: not seconds of a core spent on one provider's garbage.
        assert hostile_s < MAX_HOSTILE_S, f"the hostile stream took {hostile_s:.1f} s to end"
        assert hostile.code == grpc.StatusCode.UNAVAILABLE, (hostile.code, hostile.details)
        assert hostile.error().reason is Reason.PROVIDER_UNAVAILABLE
        assert "".join(e.delta.text for e in hostile.events) == "hostile"


async def test_the_event_guard_passes_normal_streams_through_unchanged_at_any_split() -> None:
    """The guard under LiteLLM only re-chunks a well-formed stream: same bytes, whole events."""
    from exo_remote_engine.sidecar.transports.upstream_limits import complete_events

    body = (
        b'data: {"a": 1}\n\n'
        b"event: message\r\nid: 7\r\ndata: two\r\ndata: lines\r\n\r\n"
        b": keep-alive\n\n"
        b"data: " + b"z" * 70000 + b"\n\n"
        b"data: [DONE]\n\n"
    )
    for cut in (1, 5, 17, 18, 40, 50, 64, 1000, 65536, len(body) - 3):

        async def pieces(cut: int = cut) -> Any:
            yield body[:cut]
            yield body[cut:]

        out = [chunk async for chunk in complete_events(pieces())]
        assert b"".join(out) == body, cut
        assert all(chunk.endswith((b"\n\n", b"\r\n\r\n")) for chunk in out), cut
