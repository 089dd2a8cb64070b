"""The load test's upstream, in its own process: one scripted stream per model alias.

``python -m tests.support.load_upstream --streams N --chunks C --interval-s X`` serves
:class:`~tests.support.openai_upstream.OpenAIUpstream` with a :class:`Scenario` per alias
``load-{k}`` (k < N) whose chunks are ``f"{k}:{i} "`` (i < C), one every X seconds, so
every delta names its stream and its position. It prints the URL on the first line. On
SIGTERM or SIGINT it prints one JSON line per finished stream
(model, started_at, ended_at, chunks_written, outcome; ``time.monotonic()`` values, which
on Linux are comparable across processes) and then ``END``, and exits.

Chunk ``i`` of a stream is scheduled at ``started_at + i * X`` (the upstream's ``t0`` is a
few microseconds after ``started_at``), which is what the load test measures against.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from dataclasses import asdict

from tests.support.openai_upstream import OpenAIUpstream, Scenario


def alias(k: int) -> str:
    return f"load-{k}"


def chunks(k: int, n: int) -> list[str]:
    return [f"{k}:{i} " for i in range(n)]


async def _serve(streams: int, n_chunks: int, interval_s: float) -> None:
    scenarios = {alias(k): Scenario(chunks=chunks(k, n_chunks), interval_s=interval_s) for k in range(streams)}
    upstream = OpenAIUpstream(scenarios)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with upstream:
        print(upstream.url, flush=True)
        await stop.wait()
        for record in list(upstream.connections_closed):
            print(json.dumps(asdict(record)), flush=True)
        print("END", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.load_upstream")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--chunks", type=int, required=True)
    parser.add_argument("--interval-s", type=float, required=True)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.streams, args.chunks, args.interval_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
