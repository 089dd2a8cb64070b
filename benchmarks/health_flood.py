"""``python -m benchmarks.health_flood``: what a flood of anonymous health Watch calls adds
to an authenticated node's streams (issue 11's target: p99 added < 50 ms).

Four processes: the benchmark upstream (:mod:`benchmarks.upstream`), a sidecar with a token
file, a flood (this module with ``--flood``: 500 anonymous ``Health/Watch`` calls over 10
connections, each refused or ended call reopened after ``--reopen-s``, so the sidecar's anonymous
budget stays under constant pressure), and the authenticated node (this process). The node
runs ``--streams`` concurrent Generate streams of ``--chunks`` stamped chunks at ``--rate``/s
and a ListModels call every 50 ms, once without the flood and once with it. Printed: the
per-chunk delivery latency (receive time - the upstream's send stamp) and the ListModels
latency, p50/p99 for both runs, and what the flood added.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from benchmarks.load_client import Stamps
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.target import RetryPolicy, SidecarTarget
from exo_remote_engine.generated import remote_inference_pb2 as pb
from exo_remote_engine.generated.grpc_health import health_pb2, health_pb2_grpc
from tests.support.processes import REPO, start_sidecar_process, stop_process

TOKEN = "bench-node-token-0123456789abcdef"
TARGET_P99_ADDED_MS = 50.0


# ------------------------------------------------------------------------- the flood


async def flood(address: str, calls: int, connections: int, reopen_s: float) -> None:
    """Hold ``calls`` anonymous Watch calls open for ever, reopening each refused one."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(connections)]
    counts = {"open": 0, "refused": 0}
    ready = asyncio.Event()

    async def one(stub: health_pb2_grpc.HealthStub) -> None:
        while True:
            call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            try:
                async for _ in call:
                    counts["open"] += 1
                    ready.set()
                    break
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError:
                counts["refused"] += 1
            await asyncio.sleep(reopen_s)

    tasks = [asyncio.ensure_future(one(health_pb2_grpc.HealthStub(channels[i % connections]))) for i in range(calls)]
    await asyncio.wait_for(ready.wait(), 30)
    await asyncio.sleep(1.0)
    answered, refused = counts["open"], counts["refused"]
    print(f"flooding: {calls} callers, {answered} Watch streams answered, {refused} refused", flush=True)
    await asyncio.gather(*tasks)


@contextmanager
def flood_process(address: str, calls: int, reopen_s: float) -> Iterator[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.health_flood",
            "--flood",
            address,
            "--calls",
            str(calls),
            "--reopen-s",
            str(reopen_s),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        if not line.startswith("flooding"):
            raise RuntimeError(f"the flood did not start: {line!r}")
        yield line
    finally:
        stop_process(process)


# ------------------------------------------------------------------ the measured node


async def _stream(client: SidecarClient, chunks: int, rate: float, index: int, latencies: list[float]) -> None:
    request = pb.GenerateRequest(
        request_id=f"bench-{index}",
        model="bench",
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=f"bench n={chunks} rate={rate:g}")])],
    )
    stamps = Stamps()
    async for event in client.generate(request):
        if event.HasField("delta"):
            received = time.monotonic_ns()
            latencies.extend((received - sent) / 1e6 for sent in stamps.feed(event.delta.text))


async def _listings(client: SidecarClient, stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        await client.list_models()
        latencies.append((time.monotonic() - started) * 1000)
        await asyncio.sleep(0.05)


async def measure(address: str, streams: int, chunks: int, rate: float) -> tuple[list[float], list[float]]:
    """Per-chunk delivery latencies and ListModels latencies (ms) of one run."""
    retry = RetryPolicy(attempts=1)
    client = SidecarClient(SidecarTarget(address=address, token=TOKEN, retry=retry, deadline_s=120))
    chunk_ms: list[float] = []
    listing_ms: list[float] = []
    try:
        await _stream(client, 10, rate, -1, [])  # warm the connection and the transport
        stop = asyncio.Event()
        listings = asyncio.ensure_future(_listings(client, stop, listing_ms))
        await asyncio.gather(*(_stream(client, chunks, rate, i, chunk_ms) for i in range(streams)))
        stop.set()
        await listings
    finally:
        await client.close()
    return chunk_ms, listing_ms


def _q(data: list[float], q: float) -> float:
    ordered = sorted(data)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _row(name: str, chunk_ms: list[float], listing_ms: list[float]) -> str:
    return (
        f"| {name} | {len(chunk_ms)} | {_q(chunk_ms, 0.5):.2f} / {_q(chunk_ms, 0.99):.2f} | "
        f"{len(listing_ms)} | {_q(listing_ms, 0.5):.2f} / {_q(listing_ms, 0.99):.2f} |"
    )


@contextmanager
def upstream_process() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.upstream", "--port", "0"], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().strip()
        if not re.match(r"http://127\.0\.0\.1:\d+$", url):
            raise RuntimeError(f"the upstream did not start: {url!r}")
        yield url
    finally:
        stop_process(process)


# ------------------------------------------------------------- anonymous memory (issue 21)

MIB = 1024 * 1024


def _probe_body(size: int) -> bytes:
    """A HealthCheckRequest whose service name is ``size`` bytes: valid, just not a probe."""
    varint = bytearray()
    rest = size
    while True:
        byte, rest = rest & 0x7F, rest >> 7
        varint.append(byte | (0x80 if rest else 0))
        if not rest:
            return b"\x0a" + bytes(varint) + b"s" * size


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def anonymous_memory_flood(address: str, pid: int, calls: int, body_mib: int) -> dict[str, float]:
    """RSS before, at the peak of, and after ``calls`` concurrent anonymous Health/Check
    calls with ``body_mib`` MiB bodies; MiB, plus the status codes seen."""
    body = _probe_body(body_mib * MIB)
    await asyncio.sleep(1.0)
    before = rss_bytes(pid)
    peak = before
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.01)

    sampler = asyncio.ensure_future(sample())
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) for _ in range(8)]
    codes: dict[str, int] = {}

    async def one(i: int) -> None:
        check = channels[i % len(channels)].unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        try:
            await check(body, timeout=60)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        codes[code] = codes.get(code, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(calls)))
    elapsed = time.monotonic() - started
    for channel in channels:
        await channel.close()
    await asyncio.sleep(3.0)  # let the server free what it held
    stop.set()
    await sampler
    after = rss_bytes(pid)
    print(f"codes: {codes}", flush=True)
    return {"before": before / MIB, "peak": peak / MIB, "after": after / MIB, "seconds": elapsed}


def run_memory(args: argparse.Namespace) -> int:
    """Peak and settled RSS under 96 anonymous 30 MiB health calls (target: +256 MiB at
    most, back to the baseline after)."""
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        tokens = workdir / "tokens"
        tokens.write_text(f"bench-node {TOKEN}\n")
        tokens.chmod(0o600)
        sidecar = start_sidecar_process(None, workdir / "sidecar.log", extra_args=["--token-file", str(tokens)])
        try:
            figures = asyncio.run(
                anonymous_memory_flood(sidecar.address, sidecar.process.pid, args.memory_calls, args.body_mib)
            )
        finally:
            sidecar.stop()
    added, kept = figures["peak"] - figures["before"], figures["after"] - figures["before"]
    print(f"{args.memory_calls} concurrent anonymous Health/Check calls with {args.body_mib} MiB bodies")
    print(
        f"RSS before {figures['before']:.0f} MiB, peak {figures['peak']:.0f} MiB (+{added:.0f}), "
        f"after {figures['after']:.0f} MiB ({kept:+.0f}); all answered in {figures['seconds']:.1f}s"
    )
    verdict = "PASS" if added <= TARGET_ADDED_MIB and kept <= TARGET_KEPT_MIB else "FAIL"
    print(f"{verdict}  peak at most +{TARGET_ADDED_MIB} MiB, at most +{TARGET_KEPT_MIB} MiB kept after")
    return 0


TARGET_ADDED_MIB = 256
TARGET_KEPT_MIB = 32


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp, upstream_process() as upstream:
        workdir = Path(tmp)
        config = workdir / "config.yaml"
        config.write_text(
            "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n"
            f"      api_base: {upstream}/v1\n      api_key: bench\n"
        )
        tokens = workdir / "tokens"
        tokens.write_text(f"bench-node {TOKEN}\n")
        tokens.chmod(0o600)
        sidecar = start_sidecar_process(config, workdir / "sidecar.log", extra_args=["--token-file", str(tokens)])
        try:
            quiet = asyncio.run(measure(sidecar.address, args.streams, args.chunks, args.rate))
            with flood_process(sidecar.address, args.calls, args.reopen_s) as flooding:
                flooded = asyncio.run(measure(sidecar.address, args.streams, args.chunks, args.rate))
        finally:
            sidecar.stop()
    added_chunk = _q(flooded[0], 0.99) - _q(quiet[0], 0.99)
    added_listing = _q(flooded[1], 0.99) - _q(quiet[1], 0.99)
    print(f"{args.streams} authenticated streams x {args.chunks} chunks at {args.rate:g}/s, ListModels every 50 ms")
    print(f"flood: {flooding.removeprefix('flooding: ')}")
    print()
    print("| run | chunks | delivery p50 / p99 ms | ListModels calls | ListModels p50 / p99 ms |")
    print("|---|---|---|---|---|")
    print(_row("no flood", *quiet))
    print(_row(f"{args.calls} anonymous Watch", *flooded))
    print()
    verdict = "PASS" if max(added_chunk, added_listing) < TARGET_P99_ADDED_MS else "FAIL"
    print(
        f"{verdict}  p99 added by the flood < {TARGET_P99_ADDED_MS:g} ms: "
        f"delivery {added_chunk:+.2f} ms, ListModels {added_listing:+.2f} ms"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.health_flood", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="anonymous Watch callers (default 500)")
    parser.add_argument("--streams", type=int, default=8, help="authenticated concurrent streams (default 8)")
    parser.add_argument("--chunks", type=int, default=250, help="chunks per stream (default 250)")
    parser.add_argument("--rate", type=float, default=50.0, help="chunks per second per stream (default 50)")
    parser.add_argument("--reopen-s", type=float, default=0.25, help="a flood caller's pause before reopening (0.25)")
    parser.add_argument("--flood", metavar="ADDRESS", help=argparse.SUPPRESS)  # the flood process itself
    parser.add_argument(
        "--memory", action="store_true", help="measure RSS under anonymous health calls with large bodies instead"
    )
    parser.add_argument("--memory-calls", type=int, default=96, help="concurrent anonymous calls (default 96)")
    parser.add_argument("--body-mib", type=int, default=30, help="each call's body in MiB (default 30)")
    args = parser.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    if args.memory:
        return run_memory(args)
    if args.flood:
        with contextlib.suppress(KeyboardInterrupt):  # stopped by SIGINT, as intended
            asyncio.run(flood(args.flood, args.calls, connections=10, reopen_s=args.reopen_s))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
