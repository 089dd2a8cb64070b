"""Issue #24's figures: first-token failover on a flaky member, and queueing instead of refusal.

``python -m benchmarks.routing [--quick] [--out routing.json]`` runs an in-process sidecar
(real gRPC on 127.0.0.1, the real transports) in front of the test upstream
(``tests/support/openai_upstream.py``) and prints:

* **TTFT tail.** A group of two members; ``m-flaky``'s first token takes 2 s in 20% of
  requests (at random), ``m-steady`` answers at once. ``--requests`` calls (8 at a time)
  through the group, time to first delta measured by the client; p50/p90/p99/max for:
  LiteLLM's behaviour (simple-shuffle, no first-token guard: the sidecar before #24),
  ``ttft_timeout``, ``ttft_timeout`` + ``hedge_after``, and ``ttft_timeout`` with
  tail-aware ``latency-based-routing``. Target: p99 at most ttft_timeout + 50 ms.
* **Queueing.** Two nodes, each with ``rpm: 60`` and ``queue_timeout: 90``, each sending
  ``--burst`` requests spread over 10 s (real time: the second half waits for the next
  minute window, so this part takes up to ~70 s). Target: every request completes, no
  errors, and the two nodes get equal shares; the longest wait is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from exo_remote_engine.contract.errors import RemoteError
from exo_remote_engine.engine.connection.client import SidecarClient
from tests.support.harness import chat_request, sidecar_client
from tests.support.openai_upstream import OpenAIUpstream, Scenario
from tests.support.traffic import KEY_ENV, Sidecars, deployment

SLOW_FIRST_TOKEN_S = 2.0
SLOW_SHARE = 0.2
TTFT_TIMEOUT_S = 0.25
HEDGE_AFTER_S = 0.15
TOKENS = {"n1": "bench-token-node-one-0001", "n2": "bench-token-node-two-0002"}

CASES: dict[str, str] = {
    "before (no guard, simple-shuffle)": "",
    f"ttft_timeout {TTFT_TIMEOUT_S}": f"router_settings:\n  ttft_timeout: {TTFT_TIMEOUT_S}\n",
    f"ttft_timeout {TTFT_TIMEOUT_S} + hedge_after {HEDGE_AFTER_S}": (
        f"router_settings:\n  ttft_timeout: {TTFT_TIMEOUT_S}\n  hedge_after: {HEDGE_AFTER_S}\n"
    ),
    f"ttft_timeout {TTFT_TIMEOUT_S} + latency-based-routing (p90)": (
        f"router_settings:\n  ttft_timeout: {TTFT_TIMEOUT_S}\n  routing_strategy: latency-based-routing\n"
    ),
}


class _FlakyScenarios(dict[str, Scenario]):
    """The upstream looks a model's scenario up per request: ``m-flaky`` draws a slow one
    in :data:`SLOW_SHARE` of them (the upstream itself has no per-request randomness)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._rng = random.Random(seed)
        self._slow = Scenario(stall_before_first_byte_s=SLOW_FIRST_TOKEN_S)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key == "m-flaky" and self._rng.random() < SLOW_SHARE:
            return self._slow
        return super().get(key, default)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": ordered[-1], "n": len(ordered)}


async def _ttft(client: SidecarClient, model: str, text: str) -> float:
    began = time.perf_counter()
    first: float | None = None
    async for event in client.generate(chat_request(model, text)):
        if first is None and event.HasField("delta"):
            first = time.perf_counter() - began
    assert first is not None
    return first


async def ttft_tail(workdir: Path, requests: int, concurrency: int = 8) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for number, (name, settings) in enumerate(CASES.items()):
        async with OpenAIUpstream() as upstream:
            upstream.scenarios = _FlakyScenarios(seed=number)
            sidecars = Sidecars(workdir / f"ttft{number}")
            sidecars.tmp_path.mkdir()
            url = upstream.url
            text = "model_list:\n" + deployment("g", "m-flaky", url) + deployment("g", "m-steady", url)
            sidecar = await sidecars.start(text + settings, time.time)  # type: ignore[arg-type]
            client = sidecar_client(sidecar.address)
            gate = asyncio.Semaphore(concurrency)

            async def one(i: int, client: SidecarClient = client, gate: asyncio.Semaphore = gate) -> float:
                async with gate:
                    return await _ttft(client, "g", f"r{i}")

            try:
                samples = await asyncio.gather(*(one(i) for i in range(requests)))
            finally:
                await client.close()
                await sidecars.stop()
            results[name] = _percentiles(list(samples))
    return results


async def queueing(workdir: Path, burst: int, rpm: int = 60, queue_timeout_s: float = 90.0) -> dict[str, Any]:
    async with OpenAIUpstream() as upstream:
        sidecars = Sidecars(workdir / "queue")
        sidecars.tmp_path.mkdir()
        text = "model_list:\n" + deployment("m", "m-a", upstream.url)
        text += f"exo_remote_settings:\n  queue_timeout: {queue_timeout_s:g}\n  nodes:\n"
        text += "".join(f"    {node}: {{rpm: {rpm}}}\n" for node in TOKENS)
        sidecar = await sidecars.start(text, time.time, named_tokens=TOKENS)  # type: ignore[arg-type]
        clients = {node: sidecar_client(sidecar.address, token=token) for node, token in TOKENS.items()}
        began = time.monotonic()
        waits: dict[str, list[float]] = {node: [] for node in TOKENS}
        errors: dict[str, list[str]] = {node: [] for node in TOKENS}

        async def one(node: str, i: int) -> None:
            await asyncio.sleep(10.0 * i / burst)  # `burst` requests spread over 10 s
            sent = time.monotonic()
            try:
                await _ttft(clients[node], "m", f"{node}-{i}")
            except RemoteError as exc:
                errors[node].append(exc.reason.value)
                return
            waits[node].append(time.monotonic() - sent)

        try:
            await asyncio.gather(*(one(node, i) for node in TOKENS for i in range(burst)))
        finally:
            for client in clients.values():
                await client.close()
            await sidecars.stop()
        return {
            "rpm": rpm,
            "queue_timeout_s": queue_timeout_s,
            "sent_per_node": burst,
            "completed": {node: len(w) for node, w in waits.items()},
            "errors": {node: len(e) for node, e in errors.items()},
            "longest_wait_s": {node: round(max(w, default=0.0), 2) for node, w in waits.items()},
            "wall_s": round(time.monotonic() - began, 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 TTFT requests per case, 20 queued requests")
    parser.add_argument("--requests", type=int, help="TTFT requests per case (default 400)")
    parser.add_argument("--burst", type=int, help="requests per node in the queueing run (default 120)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault(KEY_ENV, "sk-bench-0123456789abcdef")
    requests = args.requests or (100 if args.quick else 400)
    burst = args.burst or (20 if args.quick else 120)
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        tail = asyncio.run(ttft_tail(Path(tmp), requests))
        print(f"time to first token through the group ({requests} requests per case, 8 at a time), seconds")
        print(f"{'case':58} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}")
        for name, row in tail.items():
            print(f"{name:58} {row['p50']:6.3f} {row['p90']:6.3f} {row['p99']:6.3f} {row['max']:6.3f}")
        print(f"target: p99 <= ttft_timeout + 0.05 = {TTFT_TIMEOUT_S + 0.05:.2f}")
        queued = asyncio.run(queueing(Path(tmp), burst))
        print(json.dumps({"queueing": queued}, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps({"ttft_tail": tail, "queueing": queued}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
