"""Characters per second for one streamed request from an upstream writing as fast as it can.

Rows, all against the same local OpenAI-compatible upstream on 127.0.0.1:
  1. direct LiteLLM ``acompletion(stream=True)`` in this process (the baseline);
  2. our sidecar (separate process) read by the engine's gRPC client;
  3. real classic exo with the remote engine, read with the openai SDK (needs EXO_SRC and
     ``scripts/bootstrap.sh`` run with it).

Usage: ``.venv/bin/python -m benchmarks.exo_throughput [--chars 60000] [--runs 3]``.
Prints a table and writes ``bench-results/exo_throughput.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from tests.conftest import write_proxy_config
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.processes import (
    exo_skip_reason,
    free_port,
    start_exo_node,
    start_sidecar_process,
    write_peers,
)

PROSE = (
    "The quick brown fox jumps over the lazy dog while the cluster keeps streaming tokens. "
    "Remote models appear beside local ones, and every reply arrives in order, complete. "
)


def _chunks(total_chars: int) -> list[str]:
    words = (PROSE * (total_chars // len(PROSE) + 1))[:total_chars].split(" ")
    # One word per chunk, numbered so LiteLLM's repeated-chunk guard never trips.
    return [f"{w}{i % 10} " for i, w in enumerate(words)]


async def _direct_litellm(url: str) -> tuple[float, float, int]:
    import litellm

    started = time.perf_counter()
    first = 0.0
    chars = 0
    stream = await litellm.acompletion(
        model="openai/bench",
        api_base=f"{url}/v1",
        api_key="bench",
        stream=True,
        messages=[{"role": "user", "content": "go"}],
        num_retries=0,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if not chars:
                first = time.perf_counter() - started
            chars += len(chunk.choices[0].delta.content)
    return chars / (time.perf_counter() - started), first, chars


async def _sidecar(address: str) -> tuple[float, float, int]:
    from exo_remote_engine.engine.client import SidecarClient, SidecarTarget
    from exo_remote_engine.openai_wire import chat_body_to_request

    client = SidecarClient(SidecarTarget(address=address))
    request = chat_body_to_request({"messages": [{"role": "user", "content": "go"}]}, request_id="b", model="bench")
    started = time.perf_counter()
    first = 0.0
    chars = 0
    async for event in client.generate(request):
        if event.delta.text:
            if not chars:
                first = time.perf_counter() - started
            chars += len(event.delta.text)
    elapsed = time.perf_counter() - started
    await client.close()
    return chars / elapsed, first, chars


def _exo(api: str) -> tuple[float, float, int]:
    import openai

    client = openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0, timeout=600)
    started = time.perf_counter()
    first = 0.0
    chars = 0
    for chunk in client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": "go"}], stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            if not chars:
                first = time.perf_counter() - started
            chars += len(chunk.choices[0].delta.content)
    return chars / (time.perf_counter() - started), first, chars


def _median_of(runs: int, fn: Callable[[], tuple[float, float, int]]) -> dict[str, float]:
    results = [fn() for _ in range(runs)]
    return {
        "chars_per_s": statistics.median(r[0] for r in results),
        "first_char_ms": statistics.median(r[1] for r in results) * 1000,
        "chars": results[0][2],
    }


def _sync(
    coro_fn: Callable[[], Coroutine[Any, Any, tuple[float, float, int]]],
) -> Callable[[], tuple[float, float, int]]:
    return lambda: asyncio.run(coro_fn())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--chars", type=int, default=60_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows: dict[str, dict[str, float]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="exo-bench-"))
    scenario = Scenario(chunks=_chunks(args.chars), usage=(5, 5))
    with OpenAIUpstream.in_thread(scenarios={"bench": scenario}) as upstream:
        asyncio.run(_direct_litellm(upstream.url))  # warm-up: imports and first-call costs
        rows["direct LiteLLM (baseline)"] = _median_of(args.runs, _sync(lambda: _direct_litellm(upstream.url)))
        config = write_proxy_config(workdir / "config.yaml", upstream.url, ["bench"])
        sidecar = start_sidecar_process(config, workdir / "sidecar.log", env={"TEST_UPSTREAM_KEY": "bench"})
        try:
            asyncio.run(_sidecar(sidecar.address))
            rows["sidecar via gRPC client"] = _median_of(args.runs, _sync(lambda: _sidecar(sidecar.address)))
            reason = exo_skip_reason()
            if reason is None:
                node_port, api_port = free_port(), free_port()
                node = start_exo_node(
                    workdir,
                    "bench",
                    node_port,
                    api_port,
                    write_peers(workdir / "peers.json", {"bench": node_port}),
                    env={"EXO_REMOTE_SIDECAR": sidecar.address},
                    wait_models=["bench"],
                )
                try:
                    _exo(node.api)
                    rows["real exo + remote engine"] = _median_of(args.runs, lambda: _exo(node.api))
                finally:
                    node.stop()
            else:
                print(f"(exo row skipped: {reason})")
        finally:
            sidecar.stop()
    baseline = rows["direct LiteLLM (baseline)"]["chars_per_s"]
    print(f"\nOne streamed request, {args.chars:,} chars from an unbounded upstream; median of {args.runs} runs")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'path':32} {'chars/s':>10} {'x baseline':>11} {'first char ms':>14}")
    for name, row in rows.items():
        ratio = row["chars_per_s"] / baseline
        print(f"{name:32} {row['chars_per_s']:>10,.0f} {ratio:>11.2f} {row['first_char_ms']:>14.1f}")
    out = Path("bench-results")
    out.mkdir(exist_ok=True)
    (out / "exo_throughput.json").write_text(
        json.dumps({"chars": args.chars, "runs": args.runs, "rows": rows}, indent=2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
