"""What a hostile upstream costs everyone else, and what a stalled reader costs the sidecar.

``python -m benchmarks.hostile_upstream [--stall-s 30] [--rounds 3]`` starts a sidecar
process per transport (direct reader, LiteLLM) in front of the test upstream
(``tests/support/openai_upstream.py``, in a process of its own, so that neither the
upstream nor this client is what gets measured) and prints:

* added latency: a healthy stream (200 distinct deltas, one every 10 ms) is read alone,
  then again while hostile streams run next to it (200,000 ``data:`` lines without a blank
  line; one 64 MiB line). Lateness of delta ``i`` = receive time - (first delta's receive
  time + i x 10 ms); "added" is the hostile run's p99 / max minus the baseline's. Target:
  no upstream adds more than 100 ms to an unrelated stream.
* RSS growth of the sidecar while a client reads nothing for ``--stall-s`` seconds from a
  firehose upstream (valid 16 KiB deltas as fast as they are taken). Target: < 20 MiB.

Both sidecars are warmed up first (one healthy and one hostile call each), so LiteLLM's
first-call costs are not charged to the hostile body.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import grpc

from exo_remote_engine.contract.openai_chat import chat_body_to_request
from exo_remote_engine.generated import remote_inference_pb2_grpc as pb_grpc
from tests.support.openai_upstream import OpenAIUpstream, Scenario, delta_frame
from tests.support.processes import REPO, SidecarProcess, start_sidecar_process, stop_process

INTERVAL_S = 0.01
HEALTHY_CHUNKS = 200
HOSTILE: dict[str, Scenario] = {
    "many-data-lines": Scenario(chunks=["hostile"], flood=b"data: x\n", flood_count=200_000),
    "endless-line": Scenario(chunks=["hostile"], flood=b"a" * 65536, flood_count=1024),
}
SCENARIOS: dict[str, Scenario] = {
    "healthy": Scenario(chunks=[f"t{i} " for i in range(HEALTHY_CHUNKS)], interval_s=INTERVAL_S),
    "firehose": Scenario(
        chunks=["go"], flood=delta_frame("x" * 16384, "f") + delta_frame("y" * 16384, "f"), flood_count=10**7
    ),
    **HOSTILE,
}
KEY = "sk-bench-0123456789abcdef"


def _request(model: str) -> object:
    body = {"messages": [{"role": "user", "content": "go"}]}
    return chat_body_to_request(body, request_id=f"bench-{model}-{time.monotonic_ns()}", model=model)


async def _drain(stub: pb_grpc.RemoteInferenceServiceStub, model: str) -> None:
    try:
        async for _ in stub.Generate(_request(model), timeout=120):
            pass
    except grpc.aio.AioRpcError:
        pass  # the hostile stream ends in PROVIDER_UNAVAILABLE by design


async def _lateness(stub: pb_grpc.RemoteInferenceServiceStub) -> list[float]:
    """Per-delta lateness (ms) of one healthy stream against its 10 ms schedule."""
    received: dict[int, float] = {}
    async for event in stub.Generate(_request("healthy"), timeout=120):
        now = time.monotonic()
        for word in event.delta.text.split():
            received.setdefault(int(word[1:]), now)
    start = received[0]
    return [(received[i] - start - i * INTERVAL_S) * 1000 for i in sorted(received)]


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


async def _added_latency(address: str, rounds: int) -> dict[str, tuple[float, float, float, float]]:
    """body -> (baseline p99, baseline max, hostile p99, hostile max), worst round."""
    results: dict[str, tuple[float, float, float, float]] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RemoteInferenceServiceStub(channel)
        await _lateness(stub)  # warm-up
        for body in HOSTILE:
            await _drain(stub, body)
        for body in HOSTILE:
            worst = (0.0, 0.0, 0.0, 0.0)
            for _ in range(rounds):
                base = await _lateness(stub)
                healthy = asyncio.create_task(_lateness(stub))
                await asyncio.sleep(0.2)
                for _ in range(3):  # three hostile streams during the healthy one, one at a time
                    await _drain(stub, body)
                late = await healthy
                row = (_p99(base), max(base), _p99(late), max(late))
                worst = max(worst, row, key=lambda r: r[3] - r[1])
            results[body] = worst
    return results


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _stalled_reader(sidecar: SidecarProcess, stall_s: float) -> tuple[float, float]:
    """(RSS before, peak RSS) of the sidecar while a client reads nothing."""
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        call = pb_grpc.RemoteInferenceServiceStub(channel).Generate(_request("firehose"), timeout=stall_s + 60)
        await call.read()
        await asyncio.sleep(2.0)
        before = peak = _rss_mib(sidecar.process.pid)
        started = time.monotonic()
        while time.monotonic() - started < stall_s:
            await asyncio.sleep(0.5)
            peak = max(peak, _rss_mib(sidecar.process.pid))
        call.cancel()
    return before, peak


def _serve_upstream() -> None:
    """The upstream process: serves SCENARIOS, prints its URL, runs until SIGINT."""

    async def serve() -> None:
        async with OpenAIUpstream(dict(SCENARIOS)) as upstream:
            print(upstream.url, flush=True)
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


@contextmanager
def _upstream_process() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.hostile_upstream", "--serve-upstream"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stdout is not None
    try:
        yield process.stdout.readline().strip()
    finally:
        stop_process(process)


@contextmanager
def _sidecar(upstream_url: str, transport: str, workdir: Path) -> Iterator[SidecarProcess]:
    config = workdir / f"{transport}.yaml"
    lines = ["model_list:"]
    for alias in SCENARIOS:
        lines += [
            f"  - model_name: {alias}",
            "    litellm_params:",
            f"      model: openai/{alias}",
            f"      api_base: {upstream_url}/v1",
            "      api_key: os.environ/BENCH_UPSTREAM_KEY",
        ]
    config.write_text("\n".join(lines) + "\nexo_remote_settings:\n  num_retries: 0\n")
    env = {"BENCH_UPSTREAM_KEY": KEY, "EXO_REMOTE_OPENAI_FAST_PATH": "1" if transport == "direct" else "0"}
    sidecar = start_sidecar_process(config, workdir / f"{transport}.log", env)
    try:
        yield sidecar
    finally:
        sidecar.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hostile_upstream", description=__doc__.splitlines()[0])
    parser.add_argument("--stall-s", type=float, default=30.0, help="how long the stalled client reads nothing")
    parser.add_argument("--rounds", type=int, default=3, help="healthy-vs-hostile rounds per body (worst shown)")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        _serve_upstream()
        return 0
    latency: dict[str, dict[str, tuple[float, float, float, float]]] = {}
    rss: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, _upstream_process() as upstream:
        for transport in ("direct", "litellm"):
            with _sidecar(upstream, transport, Path(tmp)) as sidecar:
                latency[transport] = asyncio.run(_added_latency(sidecar.address, args.rounds))
                rss[transport] = asyncio.run(_stalled_reader(sidecar, args.stall_s))
    print("Added latency of a healthy stream (deltas every 10 ms) while hostile streams run, ms:")
    print(f"{'transport':<9} {'hostile body':<16} {'alone p99/max':>15} {'hostile p99/max':>17} {'added p99/max':>15}")
    worst_added = 0.0
    for transport, rows in latency.items():
        for body, (bp99, bmax, hp99, hmax) in rows.items():
            worst_added = max(worst_added, hmax - bmax)
            print(
                f"{transport:<9} {body:<16} {bp99:>7.1f} /{bmax:>6.1f} {hp99:>8.1f} /{hmax:>7.1f} "
                f"{hp99 - bp99:>+7.1f} /{hmax - bmax:>+6.1f}"
            )
    print(f"\nSidecar RSS while a client reads nothing for {args.stall_s:.0f} s (firehose upstream):")
    worst_growth = 0.0
    for transport, (before, peak) in rss.items():
        worst_growth = max(worst_growth, peak - before)
        print(f"{transport:<9} {before:>6.0f} MiB -> peak {peak:>6.0f} MiB ({peak - before:+.1f} MiB)")
    print()
    verdict = "PASS" if worst_added < 100 else "FAIL"
    print(f"{verdict}  added latency from a hostile upstream < 100 ms: {worst_added:.1f} ms")
    verdict = "PASS" if worst_growth < 20 else "FAIL"
    print(f"{verdict}  RSS growth with a stalled reader < 20 MiB: {worst_growth:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
